//! `bench-loadgen`: an open-loop HTTP load generator for the load benchmark. It sends
//! requests at a fixed rate whatever the answers do, and measures each latency from the
//! moment the request was *scheduled*, not sent, so a slow server cannot hide its queueing
//! by slowing the generator down (no coordinated omission). Loopback targets only.
//!
//! ```text
//! cargo run --release --example bench-loadgen -- --url http://127.0.0.1:8080/v1/chat/completions \
//!     --body '{"model":"m","messages":[{"role":"user","content":"hi"}]}' --rate 500 --duration 10
//! ```
//! Prints one JSON object with the counts and latency percentiles on stdout.
//!
//! `--unique`: every request gets its own body, `{n}` in `--body` replaced by a token unique
//! to this run and request, so a gateway's caches (e.g. of routing scores) never hit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

struct Args {
    url: String,
    body: Bytes,
    /// With `--unique`: the body around its `{n}`, spliced per request.
    unique: Option<(String, String)>,
    headers: Vec<(String, String)>,
    rate: f64,
    duration: Duration,
    warmup: Duration,
    timeout: Duration,
    max_inflight: usize,
    stream: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut url = None;
    let mut body = None;
    let mut unique = false;
    let mut headers = Vec::new();
    let mut rate = None;
    let mut duration = 10.0;
    let mut warmup = 1.0;
    let mut timeout = 10.0;
    let mut max_inflight = 4096;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("`{flag}` needs a value"));
        let num = |v: String| v.parse::<f64>().map_err(|e| format!("`{flag}`: {e}"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--body" => body = Some(value()?),
            "--header" => {
                let v = value()?;
                let (k, val) = v
                    .split_once(':')
                    .ok_or_else(|| format!("`--header {v}`: expected `name: value`"))?;
                headers.push((k.trim().to_owned(), val.trim().to_owned()));
            }
            "--rate" => rate = Some(num(value()?)?),
            "--duration" => duration = num(value()?)?,
            "--warmup" => warmup = num(value()?)?,
            "--timeout" => timeout = num(value()?)?,
            "--max-inflight" => max_inflight = num(value()?)? as usize,
            "--unique" => unique = true,
            other => {
                return Err(format!(
                    "unknown argument `{other}`; see the header of benches/load/loadgen.rs"
                ));
            }
        }
    }
    let url = url.ok_or("`--url` is required")?;
    let parsed = reqwest::Url::parse(&url).map_err(|e| format!("`--url {url}`: {e}"))?;
    let host = parsed.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!(
            "`--url {url}`: only loopback targets (127.0.0.0/8, ::1, localhost) are allowed"
        ));
    }
    let body = body.ok_or("`--body` is required")?;
    let stream = serde_json::from_str::<serde_json::Value>(&body)
        .map_err(|e| format!("`--body` is not JSON: {e}"))?
        .get("stream")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let unique = if unique {
        let (head, tail) = body
            .split_once("{n}")
            .ok_or("`--unique` needs `{n}` in `--body`, where each request's token goes")?;
        Some((head.to_owned(), tail.to_owned()))
    } else {
        None
    };
    let rate = rate.ok_or("`--rate` is required")?;
    if !(rate > 0.0 && duration > 0.0 && warmup >= 0.0 && warmup < duration && timeout > 0.0) {
        return Err("need `--rate` > 0, `--duration` > `--warmup` >= 0 and `--timeout` > 0".to_owned());
    }
    Ok(Args {
        url,
        body: Bytes::from(body),
        unique,
        headers,
        rate,
        duration: Duration::from_secs_f64(duration),
        warmup: Duration::from_secs_f64(warmup),
        timeout: Duration::from_secs_f64(timeout),
        max_inflight,
        stream,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Status,
    Transport,
    Timeout,
    BadBody,
    /// Not sent: `--max-inflight` requests were already waiting. Counted as an error, so
    /// an overloaded server is not excused by the generator giving up on it.
    Dropped,
}

struct Sample {
    outcome: Outcome,
    /// From the scheduled time to the last byte of the answer.
    latency_us: u64,
    /// From the scheduled time to the first byte of the body.
    ttfb_us: u64,
    /// How late the generator itself sent the request (self-check, not the server's).
    send_lag_us: u64,
}

#[derive(Default)]
struct Shared {
    samples: Mutex<Vec<Sample>>,
    first_error: Mutex<Option<String>>,
    inflight: AtomicUsize,
}

impl Shared {
    fn push(&self, s: Sample, record: bool) {
        if record && let Ok(mut v) = self.samples.lock() {
            v.push(s);
        }
    }

    fn note_error(&self, what: String) {
        if let Ok(mut e) = self.first_error.lock()
            && e.is_none()
        {
            *e = Some(what);
        }
    }
}

async fn one(
    client: reqwest::Client,
    args: Arc<Args>,
    shared: Arc<Shared>,
    scheduled: Instant,
    record: bool,
    token: String,
) {
    let send_lag_us = scheduled.elapsed().as_micros() as u64;
    let body = match &args.unique {
        Some((head, tail)) => Bytes::from(format!("{head}{token}{tail}")),
        None => args.body.clone(),
    };
    let mut req = client.post(&args.url).body(body);
    for (k, v) in &args.headers {
        req = req.header(k, v);
    }
    let work = async {
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                (Outcome::Timeout, e.to_string())
            } else {
                (Outcome::Transport, e.to_string())
            }
        })?;
        let status = resp.status();
        let mut resp = resp;
        let mut ttfb = None;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| (Outcome::Transport, e.to_string()))? {
            ttfb.get_or_insert_with(|| scheduled.elapsed());
            body.extend_from_slice(&chunk);
        }
        let ttfb = ttfb.unwrap_or_else(|| scheduled.elapsed());
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err((Outcome::Status, format!("HTTP {status}: {text}")));
        }
        // A gateway that answers 200 with an error inside is not a success.
        let good = if args.stream {
            body.ends_with(b"data: [DONE]\n\n") && !body.windows(10).any(|w| w == b"{\"error\":{")
        } else {
            body.windows(9).any(|w| w == b"\"choices\"")
        };
        if !good {
            let text = String::from_utf8_lossy(&body[body.len().saturating_sub(300)..]).into_owned();
            return Err((Outcome::BadBody, format!("unexpected body: {text}")));
        }
        Ok(ttfb)
    };
    let (outcome, ttfb) = match tokio::time::timeout(args.timeout, work).await {
        Ok(Ok(ttfb)) => (Outcome::Ok, ttfb),
        Ok(Err((o, msg))) => {
            shared.note_error(msg);
            (o, scheduled.elapsed())
        }
        Err(_) => {
            shared.note_error(format!("no complete answer within {:?}", args.timeout));
            (Outcome::Timeout, scheduled.elapsed())
        }
    };
    let latency_us = scheduled.elapsed().as_micros() as u64;
    shared.inflight.fetch_sub(1, Ordering::Relaxed);
    shared.push(
        Sample {
            outcome,
            latency_us,
            ttfb_us: ttfb.as_micros() as u64,
            send_lag_us,
        },
        record,
    );
}

fn percentiles(mut v: Vec<u64>) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    v.sort_unstable();
    // Nearest-rank percentile, in milliseconds.
    let p = |q: f64| {
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1] as f64 / 1000.0
    };
    let mean = v.iter().sum::<u64>() as f64 / v.len() as f64 / 1000.0;
    json!({
        "p50": p(0.50), "p90": p(0.90), "p99": p(0.99), "p999": p(0.999),
        "max": p(1.0), "mean": mean, "n": v.len(),
    })
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let client = match reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot build the HTTP client: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(Shared::default());
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let total = (args.duration.as_secs_f64() * args.rate).round() as u64;
    let start = Instant::now() + Duration::from_millis(50);
    let measured_from = start + args.warmup;
    // Unique across runs too: the same gateway serves every step of a benchmark.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();

    // The schedule runs on its own OS thread: `thread::sleep` wakes within tens of
    // microseconds, where tokio's timer wheel rounds to whole milliseconds.
    for i in 0..total {
        let scheduled = start + period.mul_f64(i as f64);
        let now = Instant::now();
        if scheduled > now {
            std::thread::sleep(scheduled - now);
        }
        let record = scheduled >= measured_from;
        if shared.inflight.load(Ordering::Relaxed) >= args.max_inflight {
            shared.note_error(format!("more than {} requests in flight", args.max_inflight));
            shared.push(
                Sample {
                    outcome: Outcome::Dropped,
                    latency_us: 0,
                    ttfb_us: 0,
                    send_lag_us: 0,
                },
                record,
            );
            continue;
        }
        shared.inflight.fetch_add(1, Ordering::Relaxed);
        let token = if args.unique.is_some() {
            format!("{run:x}-{i}")
        } else {
            String::new()
        };
        rt.spawn(one(
            client.clone(),
            args.clone(),
            shared.clone(),
            scheduled,
            record,
            token,
        ));
    }
    // Every request ends by its own timeout; wait for them, bounded.
    let deadline = Instant::now() + args.timeout + Duration::from_secs(2);
    while shared.inflight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stuck = shared.inflight.load(Ordering::Relaxed);
    rt.shutdown_timeout(Duration::from_millis(100));

    let samples = std::mem::take(&mut *shared.samples.lock().unwrap_or_else(|e| e.into_inner()));
    let count = |o: Outcome| samples.iter().filter(|s| s.outcome == o).count();
    let measured = samples.len() + stuck;
    let ok = count(Outcome::Ok);
    let errors = measured - ok;
    let window = (args.duration - args.warmup).as_secs_f64();
    let ok_lat: Vec<u64> = samples
        .iter()
        .filter(|s| s.outcome == Outcome::Ok)
        .map(|s| s.latency_us)
        .collect();
    let ok_ttfb: Vec<u64> = samples
        .iter()
        .filter(|s| s.outcome == Outcome::Ok)
        .map(|s| s.ttfb_us)
        .collect();
    let lag: Vec<u64> = samples
        .iter()
        .filter(|s| s.outcome != Outcome::Dropped)
        .map(|s| s.send_lag_us)
        .collect();
    let first_error = shared.first_error.lock().map(|e| e.clone()).unwrap_or_default();
    let out = json!({
        "rate": args.rate,
        "window_s": window,
        "scheduled": measured,
        "ok": ok,
        "errors": errors,
        "error_rate": if measured == 0 { 0.0 } else { errors as f64 / measured as f64 },
        "error_kinds": {
            "status": count(Outcome::Status),
            "transport": count(Outcome::Transport),
            "timeout": count(Outcome::Timeout) + stuck,
            "bad_body": count(Outcome::BadBody),
            "dropped": count(Outcome::Dropped),
        },
        "ok_rps": ok as f64 / window,
        "latency_ms": percentiles(ok_lat),
        "ttfb_ms": percentiles(ok_ttfb),
        "send_lag_ms": percentiles(lag),
        "first_error": first_error,
    });
    println!("{out}");
    std::process::ExitCode::SUCCESS
}
