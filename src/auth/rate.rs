//! Per-key rate limits (requests and tokens per minute) with `governor`'s GCRA: one pair
//! of limiters per key, made on the key's first request.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::KeyLimits;
use crate::error::Error;

struct KeyLimiters {
    /// The quotas these were built with; a key whose limits changed gets new limiters.
    rpm: Option<u32>,
    tpm: Option<u32>,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
}

#[derive(Default)]
pub struct RateLimits {
    keys: Mutex<HashMap<String, Arc<KeyLimiters>>>,
}

fn limiter(per_minute: Option<u32>) -> Option<DefaultDirectRateLimiter> {
    // A limit of 0 would refuse everything; the config and CLI reject it, so treat it as none.
    per_minute
        .and_then(NonZeroU32::new)
        .map(|n| RateLimiter::direct(Quota::per_minute(n)))
}

/// Whole seconds to wait, at least 1 (a `retry-after: 0` invites a hot retry loop).
fn retry_secs(wait: std::time::Duration) -> u64 {
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
            requests: limiter(limits.rpm),
            tokens: limiter(limits.tpm),
        });
        keys.insert(key_id.to_owned(), l.clone());
        l
    }

    /// Counts one request against the key's requests-per-minute limit.
    pub fn check_request(&self, key_id: &str, limits: &KeyLimits) -> Result<(), Error> {
        let l = self.limiters(key_id, limits);
        let (Some(rl), Some(rpm)) = (&l.requests, l.rpm) else {
            return Ok(());
        };
        rl.check().map_err(|not_until| {
            let secs = retry_secs(not_until.wait_time_from(DefaultClock::default().now()));
            Error::RateLimited {
                message: format!("rate limit reached for this key: {rpm} requests per minute; retry in {secs} s"),
                retry_after_secs: secs,
            }
        })
    }

    /// Counts `tokens` (the request's estimated prompt plus the most it may generate)
    /// against the key's tokens-per-minute limit.
    pub fn check_tokens(&self, key_id: &str, limits: &KeyLimits, tokens: u64) -> Result<(), Error> {
        let l = self.limiters(key_id, limits);
        let (Some(rl), Some(tpm)) = (&l.tokens, l.tpm) else {
            return Ok(());
        };
        let n = NonZeroU32::new(tokens.clamp(1, u64::from(u32::MAX)) as u32).unwrap_or(NonZeroU32::MIN);
        match rl.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let secs = retry_secs(not_until.wait_time_from(DefaultClock::default().now()));
                Err(Error::RateLimited {
                    message: format!(
                        "rate limit reached for this key: {tpm} tokens per minute, and this request counts {tokens} (estimated prompt + `max_tokens`); retry in {secs} s"
                    ),
                    retry_after_secs: secs,
                })
            }
            // It would not fit even in an empty minute: waiting cannot help.
            Err(_) => Err(Error::invalid(
                format!(
                    "this request counts {tokens} tokens (estimated prompt + `max_tokens`), more than this key's limit of {tpm} tokens per minute; lower `max_tokens` or shorten the prompt"
                ),
                Some("max_tokens"),
            )),
        }
    }
}
