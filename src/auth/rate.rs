//! Per-key rate limits (requests and tokens per minute) with `governor`'s GCRA: one pair
//! of limiters per key, made on the key's first request, and what they say in OpenAI's
//! `x-ratelimit-*` response headers.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::KeyLimits;
use crate::error::Error;

type Gcra = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One per-minute limit of one key.
struct Limiter {
    per_minute: u32,
    gcra: Gcra,
    /// When the bucket is full again, as of governor's last decision for this key. Governor
    /// keeps its state (the "theoretical arrival time") private and has no way to read it
    /// without counting a request, so this mirrors it: GCRA's own step on each admitted
    /// request, kept within the remaining burst governor reports (rounded down, so within
    /// one interval), and the exact wait governor reports for a refused one. `None`: never
    /// used, full.
    full_at: Mutex<Option<Instant>>,
}

/// What one limit looks like now, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: u32,
    /// Requests (or tokens) that would be admitted now; may be one low (see `reset`).
    pub remaining: u32,
    /// Until the limit is back to `limit` if nothing more is counted; may be up to one
    /// replenishment interval (60 s / `limit`) late, as an admitted request's remaining
    /// burst is reported rounded down.
    pub reset: Duration,
}

impl Limiter {
    fn new(per_minute: Option<u32>) -> Option<Limiter> {
        // A limit of 0 would refuse everything; the config and CLI reject it, so treat it as none.
        let n = NonZeroU32::new(per_minute?)?;
        Some(Limiter {
            per_minute: n.get(),
            gcra: RateLimiter::direct(Quota::per_minute(n)).with_middleware::<StateInformationMiddleware>(),
            full_at: Mutex::new(None),
        })
    }

    /// How long the bucket takes to regain one request (or token).
    fn interval(&self) -> Duration {
        Duration::from_secs(60) / self.per_minute
    }

    /// Counts `n` requests (or tokens) if they fit now.
    fn decide(&self, n: NonZeroU32) -> Decision {
        let Ok(outcome) = self.gcra.check_n(n) else {
            return Decision::Never;
        };
        let now = Instant::now();
        let interval = self.interval();
        let mut full_at = self.full_at.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(state) => {
                // GCRA's own step (full again `n` intervals after the later of then and now)
                // keeps the mirror exact, kept within what governor reports: with `remaining`
                // left after this request, it is full again in (used - 1, used] intervals.
                let stepped = full_at.map_or(now, |t| t.max(now)) + interval * n.get();
                let used = self.per_minute.saturating_sub(state.remaining_burst_capacity());
                let latest = now + interval * used;
                let earliest = latest.checked_sub(interval).unwrap_or(now);
                *full_at = Some(stepped.clamp(earliest, latest));
                Decision::Admitted
            }
            // Refused until `wait`, when `n` are free; the others refill after that. Exact.
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                *full_at = Some(now + wait + interval * self.per_minute.saturating_sub(n.get()));
                Decision::NotBefore(wait)
            }
        }
    }

    fn window(&self) -> Window {
        let full_at = *self.full_at.lock().unwrap_or_else(|p| p.into_inner());
        let reset = full_at.map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()));
        let in_use = reset.as_nanos().div_ceil(self.interval().as_nanos().max(1));
        Window {
            limit: self.per_minute,
            remaining: self
                .per_minute
                .saturating_sub(u32::try_from(in_use).unwrap_or(u32::MAX)),
            reset,
        }
    }
}

enum Decision {
    Admitted,
    /// Fits once this much time has passed.
    NotBefore(Duration),
    /// Larger than the whole limit: never fits.
    Never,
}

struct KeyLimiters {
    /// The quotas these were built with; a key whose limits changed gets new limiters.
    rpm: Option<u32>,
    tpm: Option<u32>,
    requests: Option<Limiter>,
    tokens: Option<Limiter>,
}

#[derive(Default)]
pub struct RateLimits {
    keys: Mutex<HashMap<String, Arc<KeyLimiters>>>,
}

/// Whole seconds to wait, at least 1 (a `retry-after: 0` invites a hot retry loop).
fn retry_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

impl RateLimits {
    fn limiters(&self, key_id: &str, limits: &KeyLimits) -> Arc<KeyLimiters> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = keys.get(key_id)
            && l.rpm == limits.rpm
            && l.tpm == limits.tpm
        {
            return l.clone();
        }
        let l = Arc::new(KeyLimiters {
            rpm: limits.rpm,
            tpm: limits.tpm,
            requests: Limiter::new(limits.rpm),
            tokens: Limiter::new(limits.tpm),
        });
        keys.insert(key_id.to_owned(), l.clone());
        l
    }

    /// Counts one request against the key's requests-per-minute limit.
    pub fn check_request(&self, key_id: &str, limits: &KeyLimits) -> Result<(), Error> {
        // Most keys have no limits: they need not take the lock every request passes through.
        if limits.rpm.is_none() {
            return Ok(());
        }
        let l = self.limiters(key_id, limits);
        let Some(rl) = &l.requests else {
            return Ok(());
        };
        let wait = match rl.decide(NonZeroU32::MIN) {
            Decision::Admitted => return Ok(()),
            Decision::NotBefore(wait) => wait,
            // Cannot happen (the burst is at least one request); refusing is the safe side.
            Decision::Never => rl.interval(),
        };
        let secs = retry_secs(wait);
        Err(Error::RateLimited {
            message: format!(
                "rate limit reached for this key: {} requests per minute; retry in {secs} s",
                rl.per_minute
            ),
            retry_after_secs: secs,
        })
    }

    /// Counts `tokens` (the request's estimated prompt plus the most it may generate)
    /// against the key's tokens-per-minute limit.
    pub fn check_tokens(&self, key_id: &str, limits: &KeyLimits, tokens: u64) -> Result<(), Error> {
        if limits.tpm.is_none() {
            return Ok(());
        }
        let l = self.limiters(key_id, limits);
        let Some(rl) = &l.tokens else {
            return Ok(());
        };
        let tpm = rl.per_minute;
        let n = NonZeroU32::new(tokens.clamp(1, u64::from(u32::MAX)) as u32).unwrap_or(NonZeroU32::MIN);
        match rl.decide(n) {
            Decision::Admitted => Ok(()),
            Decision::NotBefore(wait) => {
                let secs = retry_secs(wait);
                Err(Error::RateLimited {
                    message: format!(
                        "rate limit reached for this key: {tpm} tokens per minute, and this request counts {tokens} (estimated prompt + `max_tokens`); retry in {secs} s"
                    ),
                    retry_after_secs: secs,
                })
            }
            // It would not fit even in an empty minute: waiting cannot help.
            Decision::Never => Err(Error::invalid(
                format!(
                    "this request counts {tokens} tokens (estimated prompt + `max_tokens`), more than this key's limit of {tpm} tokens per minute; lower `max_tokens` or shorten the prompt"
                ),
                Some("max_tokens"),
            )),
        }
    }

    /// The key's limits as they stand, without counting anything: (requests, tokens), each
    /// `None` when the key has no such limit.
    pub fn windows(&self, key_id: &str, limits: &KeyLimits) -> (Option<Window>, Option<Window>) {
        let fresh = |per_minute: Option<u32>| {
            per_minute.filter(|&n| n > 0).map(|limit| Window {
                limit,
                remaining: limit,
                reset: Duration::ZERO,
            })
        };
        let (rpm, tpm) = (fresh(limits.rpm), fresh(limits.tpm));
        // Most keys have no limits: no need to take the lock every response passes through.
        if rpm.is_none() && tpm.is_none() {
            return (None, None);
        }
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        match keys.get(key_id) {
            Some(l) if l.rpm == limits.rpm && l.tpm == limits.tpm => (
                l.requests.as_ref().map(Limiter::window),
                l.tokens.as_ref().map(Limiter::window),
            ),
            // Nothing counted yet under these limits: they are full.
            _ => (rpm, tpm),
        }
    }
}

/// Adds OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limits a
/// key has. `reset` is in OpenAI's form (`20s`, `1m0s`, `350ms`), rounded up.
pub fn put_headers(h: &mut HeaderMap, (requests, tokens): (Option<Window>, Option<Window>)) {
    const REQUESTS: [&str; 3] = [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ];
    const TOKENS: [&str; 3] = [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ];
    for (names, w) in [(REQUESTS, requests), (TOKENS, tokens)] {
        let Some(w) = w else { continue };
        let values = [w.limit.to_string(), w.remaining.to_string(), duration_text(w.reset)];
        for (name, value) in names.into_iter().zip(values) {
            if let Ok(v) = HeaderValue::try_from(value) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
    }
}

/// `350ms`, `20s`, `1m0s`: rounded up, so a client that waits this long finds the limit full.
fn duration_text(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_nanos().div_ceil(1_000_000));
    }
    let secs = d.as_nanos().div_ceil(1_000_000_000);
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}
