//! Fault handling around one tier's backend: timeouts' settings, retries with jittered
//! exponential backoff, and the circuit breaker. Decides *whether* and *when* to call
//! again; it never talks to the network itself and never sees a request body.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::Error;

/// Per-tier time limits of an HTTP backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// TCP (and TLS) connection set-up.
    pub connect: Duration,
    /// Until the response headers (whole answers) or the first SSE event (streams).
    pub first_token: Duration,
    /// The whole call, body included.
    pub total: Duration,
}

/// When to ask the same tier again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    /// Retries after the first call (0: never retry).
    pub max_retries: u32,
    /// Backoff before retry n (from 0) is drawn from [b/2, b] with b = base × 2^n, capped.
    pub backoff: Duration,
    /// Cap on one backoff; an upstream's `retry-after` above it is not waited for (the
    /// request falls back or fails at once instead).
    pub backoff_max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 2,
            backoff: Duration::from_millis(250),
            backoff_max: Duration::from_secs(8),
        }
    }
}

impl RetryConfig {
    /// The wait before retry `n` (0-based), or `None` when the error must not be retried.
    /// `jitter` is in [0, 1).
    pub fn delay(&self, n: u32, err: &Error, jitter: f64) -> Option<Duration> {
        if n >= self.max_retries || !err.retryable() {
            return None;
        }
        let exp = self
            .backoff
            .saturating_mul(1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX));
        let capped = exp.min(self.backoff_max);
        // "Equal jitter": at least half the backoff, so retries do not bunch up at zero.
        let jittered = capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        match err {
            Error::UpstreamRateLimited { retry_after, .. } => {
                match retry_after.as_deref().and_then(parse_retry_after) {
                    Some(ra) if ra > self.backoff_max => None,
                    Some(ra) => Some(ra.max(jittered)),
                    None => Some(jittered),
                }
            }
            _ => Some(jittered),
        }
    }
}

/// `retry-after` in seconds (integer or decimal). The HTTP-date form is not used by the
/// LLM APIs we front; it counts as absent.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// A number in [0, 1) that differs between calls; good enough to spread retries.
fn jitter() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
}

/// Calls `op` until it succeeds, fails for good, or the retries run out. Each failed call
/// that would be followed by another is reported to `failed` (for the ledger and the retry
/// counter) before the wait: once per retry. `failed` returning false stops there, with
/// that call's error (nobody waits for the answer any more).
/// The breaker is asked before every call and told every result.
pub async fn with_retries<T, F, Fut>(
    tier: &str,
    retry: &RetryConfig,
    breaker: Option<&Breaker>,
    mut op: F,
    mut failed: impl FnMut(&Error) -> bool,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut n = 0;
    loop {
        let permit = match breaker {
            Some(b) => Some(
                b.try_acquire()
                    .ok_or_else(|| Error::CircuitOpen { tier: tier.to_owned() })?,
            ),
            None => None,
        };
        let result = op().await;
        if let Some(p) = permit {
            match &result {
                Ok(_) => p.success(),
                Err(e) if e.is_backend_failure() => p.failure(),
                // A 4xx or 429 says nothing about the backend's health.
                Err(_) => p.success(),
            }
        }
        let e = match result {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let Some(wait) = retry.delay(n, &e, jitter()) else {
            return Err(e);
        };
        if !failed(&e) {
            return Err(e);
        }
        // Codes and timings only: error messages are the client-facing ones, no secrets.
        tracing::warn!(
            tier,
            code = e.code(),
            retry = n + 1,
            wait_ms = wait.as_millis() as u64,
            "retrying tier"
        );
        tokio::time::sleep(wait).await;
        n += 1;
    }
}

/// Circuit-breaker settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub consecutive_failures: u32,
    /// Failure share in (0, 1] over `window` that opens it, once the window holds at
    /// least `min_calls` results.
    pub failure_rate: f64,
    pub window: Duration,
    pub min_calls: u32,
    /// How long an open circuit refuses calls before one probe is let through.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: Duration::from_secs(30),
            min_calls: 10,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// Closed (calls flow), open (calls fail at once), half-open (one probe decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl CircuitState {
    pub fn name(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// Time source, injected so tests drive the state machine without sleeping.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// One backend's circuit breaker.
pub struct Breaker {
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
    /// Transitions into each state, indexed by `CircuitState as usize`.
    transitions: [AtomicU64; 3],
}

struct Inner {
    state: CircuitState,
    consecutive: u32,
    /// Recent results (time, failed), oldest first, no older than the window.
    recent: VecDeque<(Instant, bool)>,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

/// Bounds the window's memory whatever the request rate.
const MAX_RECENT: usize = 1024;

/// Leave to make one call; say how it went. Dropped unanswered (the caller went away), it
/// frees a half-open probe slot without counting for or against the backend.
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    settled: bool,
}

impl Permit<'_> {
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.record(self.probe, false);
    }

    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.record(self.probe, true);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.breaker.lock().probe_in_flight = false;
        }
    }
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(config: BreakerConfig, clock: Arc<dyn Clock>) -> Breaker {
        Breaker {
            config,
            clock,
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                consecutive: 0,
                recent: VecDeque::new(),
                opened_at: None,
                probe_in_flight: false,
            }),
            transitions: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain counters behind; they stay usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state now (an open circuit whose cooldown is over reads as half-open).
    pub fn state(&self) -> CircuitState {
        let mut g = self.lock();
        self.refresh(&mut g);
        g.state
    }

    /// Transitions into `state` so far.
    pub fn transitions(&self, state: CircuitState) -> u64 {
        self.transitions[state as usize].load(Ordering::Relaxed)
    }

    fn set(&self, g: &mut Inner, state: CircuitState) {
        if g.state != state {
            g.state = state;
            self.transitions[state as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn refresh(&self, g: &mut Inner) {
        if g.state == CircuitState::Open
            && g.opened_at
                .is_some_and(|t| self.clock.now().saturating_duration_since(t) >= self.config.cooldown)
        {
            self.set(g, CircuitState::HalfOpen);
            g.probe_in_flight = false;
        }
    }

    /// A permit to call the backend, or `None` when the circuit is open (or half-open
    /// with its probe already out).
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        let mut g = self.lock();
        self.refresh(&mut g);
        let probe = match g.state {
            CircuitState::Closed => false,
            CircuitState::Open => return None,
            CircuitState::HalfOpen if g.probe_in_flight => return None,
            CircuitState::HalfOpen => {
                g.probe_in_flight = true;
                true
            }
        };
        Some(Permit {
            breaker: self,
            probe,
            settled: false,
        })
    }

    /// A failure found after the call was let through and counted: a stream that broke,
    /// stalled or went bad after its first event.
    pub fn record_late_failure(&self) {
        self.record(false, true);
    }

    fn record(&self, probe: bool, failed: bool) {
        let now = self.clock.now();
        let mut g = self.lock();
        if probe {
            g.probe_in_flight = false;
        }
        if g.state == CircuitState::HalfOpen && probe {
            if failed {
                self.open(&mut g, now);
            } else {
                self.set(&mut g, CircuitState::Closed);
                g.consecutive = 0;
                g.recent.clear();
            }
            return;
        }
        if g.state != CircuitState::Closed {
            // A call admitted before the circuit opened: its result is old news.
            return;
        }
        g.consecutive = if failed { g.consecutive + 1 } else { 0 };
        while g
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.config.window)
            || g.recent.len() >= MAX_RECENT
        {
            g.recent.pop_front();
        }
        g.recent.push_back((now, failed));
        let calls = g.recent.len() as u32;
        let failures = g.recent.iter().filter(|(_, f)| *f).count() as f64;
        let rate_trips = calls >= self.config.min_calls.max(1) && failures / calls as f64 >= self.config.failure_rate;
        if failed && (g.consecutive >= self.config.consecutive_failures || rate_trips) {
            self.open(&mut g, now);
        }
    }

    fn open(&self, g: &mut Inner, now: Instant) {
        self.set(g, CircuitState::Open);
        g.opened_at = Some(now);
        g.consecutive = 0;
        g.recent.clear();
        g.probe_in_flight = false;
    }
}

#[cfg(test)]
mod tests;
