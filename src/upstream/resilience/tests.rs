use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Breaker, BreakerConfig, CircuitState, Clock, RetryConfig};
use crate::error::Error;

/// A clock the test moves by hand.
struct ManualClock {
    start: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            start: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        })
    }

    fn advance(&self, d: Duration) {
        *self.offset.lock().expect("clock") += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.offset.lock().expect("clock")
    }
}

fn breaker(clock: &Arc<ManualClock>) -> Breaker {
    let config = BreakerConfig {
        consecutive_failures: 3,
        failure_rate: 0.5,
        window: Duration::from_secs(10),
        min_calls: 6,
        cooldown: Duration::from_secs(5),
    };
    Breaker::with_clock(config, clock.clone())
}

fn fail(b: &Breaker) {
    b.try_acquire().expect("admitted").failure();
}

fn succeed(b: &Breaker) {
    b.try_acquire().expect("admitted").success();
}

#[test]
fn consecutive_failures_open_then_cooldown_half_opens_and_a_probe_closes() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    fail(&b);
    fail(&b);
    assert_eq!(b.state(), CircuitState::Closed);
    fail(&b);
    assert_eq!(b.state(), CircuitState::Open);
    assert!(b.try_acquire().is_none(), "an open circuit refuses calls");

    clock.advance(Duration::from_millis(4999));
    assert!(b.try_acquire().is_none(), "still cooling down");
    clock.advance(Duration::from_millis(1));
    assert_eq!(b.state(), CircuitState::HalfOpen);
    let probe = b.try_acquire().expect("one probe goes through");
    assert!(b.try_acquire().is_none(), "only one probe at a time");
    probe.success();
    assert_eq!(b.state(), CircuitState::Closed);
    succeed(&b);
    assert_eq!(b.transitions(CircuitState::Open), 1);
    assert_eq!(b.transitions(CircuitState::HalfOpen), 1);
    assert_eq!(b.transitions(CircuitState::Closed), 1);
}

#[test]
fn a_failed_probe_reopens_for_another_cooldown() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    for _ in 0..3 {
        fail(&b);
    }
    clock.advance(Duration::from_secs(5));
    fail(&b);
    assert_eq!(b.state(), CircuitState::Open);
    clock.advance(Duration::from_secs(4));
    assert!(b.try_acquire().is_none());
    clock.advance(Duration::from_secs(1));
    assert!(b.try_acquire().is_some());
    assert_eq!(b.transitions(CircuitState::Open), 2);
}

#[test]
fn an_abandoned_probe_frees_the_slot() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    for _ in 0..3 {
        fail(&b);
    }
    clock.advance(Duration::from_secs(5));
    drop(b.try_acquire().expect("probe"));
    assert_eq!(b.state(), CircuitState::HalfOpen);
    assert!(b.try_acquire().is_some(), "the next request may probe");
}

#[test]
fn failure_rate_over_the_window_opens_without_a_streak() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    // fail, ok, fail, ok, fail: never 3 in a row, 3 of 5 failed but under min_calls.
    for i in 0..5 {
        if i % 2 == 0 { fail(&b) } else { succeed(&b) }
    }
    assert_eq!(b.state(), CircuitState::Closed);
    fail(&b);
    assert_eq!(b.state(), CircuitState::Open, "4 of 6 failed >= 50 %");
}

#[test]
fn old_results_leave_the_window() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    for _ in 0..2 {
        fail(&b);
        succeed(&b);
    }
    clock.advance(Duration::from_secs(11));
    for _ in 0..4 {
        succeed(&b);
    }
    fail(&b);
    fail(&b);
    assert_eq!(b.state(), CircuitState::Closed, "2 of 6 in the window failed");
}

#[test]
fn retries_back_off_exponentially_with_jitter_and_a_cap() {
    let r = RetryConfig {
        max_retries: 5,
        backoff: Duration::from_millis(100),
        backoff_max: Duration::from_millis(300),
    };
    let e500 = Error::UpstreamStatus {
        tier: "t".into(),
        status: 500,
    };
    assert_eq!(r.delay(0, &e500, 0.0), Some(Duration::from_millis(50)));
    assert_eq!(r.delay(0, &e500, 0.999_999).map(|d| d.as_millis()), Some(99));
    assert_eq!(r.delay(1, &e500, 0.0), Some(Duration::from_millis(100)));
    assert_eq!(
        r.delay(3, &e500, 0.0),
        Some(Duration::from_millis(150)),
        "capped at 300 ms before jitter"
    );
    assert_eq!(r.delay(5, &e500, 0.0), None, "retries exhausted");
}

#[test]
fn retry_after_is_honoured_up_to_the_cap() {
    let r = RetryConfig {
        max_retries: 2,
        backoff: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
    };
    let limited = |v: Option<&str>| Error::UpstreamRateLimited {
        tier: "t".into(),
        retry_after: v.map(str::to_owned),
    };
    assert_eq!(r.delay(0, &limited(Some("1")), 0.0), Some(Duration::from_secs(1)));
    assert_eq!(r.delay(0, &limited(Some("0.01")), 0.0), Some(Duration::from_millis(50)));
    assert_eq!(
        r.delay(0, &limited(Some("30")), 0.0),
        None,
        "too long to wait: fall back instead"
    );
    assert_eq!(r.delay(0, &limited(None), 0.0), Some(Duration::from_millis(50)));
}

#[test]
fn client_errors_and_late_timeouts_are_never_retried() {
    let r = RetryConfig::default();
    for e in [
        Error::UpstreamRejected {
            tier: "t".into(),
            status: 400,
            detail: "bad".into(),
        },
        Error::UpstreamTimeout {
            tier: "t".into(),
            secs: 1.0,
            phase: "first token",
        },
        Error::UpstreamUnreachable {
            tier: "t".into(),
            connected: true,
        },
        Error::CircuitOpen { tier: "t".into() },
    ] {
        assert_eq!(r.delay(0, &e, 0.5), None, "{e:?}");
    }
    for e in [
        Error::UpstreamTimeout {
            tier: "t".into(),
            secs: 1.0,
            phase: "connect",
        },
        Error::UpstreamUnreachable {
            tier: "t".into(),
            connected: false,
        },
    ] {
        assert!(r.delay(0, &e, 0.5).is_some(), "{e:?}");
    }
}

#[test]
fn streams_that_break_after_starting_count_as_failures() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    for _ in 0..3 {
        // Each stream started (a success for the breaker) and then broke.
        succeed(&b);
        b.record_late_failure();
    }
    assert_eq!(b.state(), CircuitState::Open);
}
