//! Access and spend: virtual API keys (who may call), per-key rate limits (how fast) and
//! per-key budgets (how much). Owns no HTTP routing: handlers ask it and map its errors.

pub mod budget;
pub mod rate;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, header};

pub use budget::{Budgets, Hold, OverBudget};
pub use rate::RateLimits;
pub use store::{ApiKey, KeyStore, NewKey};

use crate::error::Error;

/// A key's limits; `None` means unlimited (or, on a key, "the `[auth]` default").
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeyLimits {
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub daily_usd: Option<f64>,
    pub monthly_usd: Option<f64>,
}

impl KeyLimits {
    /// The key's own limits, each falling back to the default.
    pub fn or(self, defaults: &KeyLimits) -> KeyLimits {
        KeyLimits {
            rpm: self.rpm.or(defaults.rpm),
            tpm: self.tpm.or(defaults.tpm),
            daily_usd: self.daily_usd.or(defaults.daily_usd),
            monthly_usd: self.monthly_usd.or(defaults.monthly_usd),
        }
    }

    pub fn has_budget(&self) -> bool {
        self.daily_usd.is_some() || self.monthly_usd.is_some()
    }
}

/// `[auth]` of the configuration.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub enabled: bool,
    pub keys_db: PathBuf,
    /// How long a looked-up key (or a miss) is trusted before the store is read again:
    /// the longest a revocation takes to apply.
    pub cache_ttl: Duration,
    /// `/report` and `/report.json` need a key.
    pub protect_reports: bool,
    /// `/metrics` needs a key.
    pub protect_metrics: bool,
    /// Limits of keys created without their own.
    pub defaults: KeyLimits,
    /// Output tokens assumed for rate limits and budget reservations when a request sets
    /// no `max_tokens`.
    pub default_max_output_tokens: u64,
}

/// An authenticated caller: its key, with the limits that apply to it.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: Arc<ApiKey>,
    pub limits: KeyLimits,
}

/// The gateway's side of access control; built once at start-up, its key store switched by
/// a reload that turns auth on or names another store ([`Auth::follow`]).
pub struct Auth {
    /// The open store and its path; `None` while auth is off.
    store: Mutex<Option<(PathBuf, KeyStore)>>,
    /// Key hash → the key (or `None`: no such key). Misses are cached too, so a client
    /// retrying a wrong key does not read the store on every request.
    cache: moka::sync::Cache<String, Option<Arc<ApiKey>>>,
    pub rate: RateLimits,
    pub budgets: Arc<Budgets>,
}

impl Auth {
    /// Opens the key store (when auth is on) and rebuilds today's and this month's spend
    /// per key from the ledger.
    pub fn start(cfg: &AuthConfig, ledger: &Path) -> Result<Auth, String> {
        let store = if cfg.enabled {
            Some((cfg.keys_db.clone(), KeyStore::open(&cfg.keys_db)?))
        } else {
            None
        };
        Ok(Auth {
            store: Mutex::new(store),
            cache: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cfg.cache_ttl)
                .build(),
            rate: RateLimits::default(),
            budgets: Arc::new(Budgets::from_ledger(ledger, crate::report::now_ms())?),
        })
    }

    /// Makes the store the one `cfg` names, for a reload: opens it when auth is turned on or
    /// `keys_db` changed (then keys cached from the old store are forgotten). An error leaves
    /// everything as it was, so the reload can be rejected whole.
    pub fn follow(&self, cfg: &AuthConfig) -> Result<(), String> {
        if !cfg.enabled {
            return Ok(());
        }
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if store.as_ref().is_some_and(|(path, _)| *path == cfg.keys_db) {
            return Ok(());
        }
        let opened = KeyStore::open(&cfg.keys_db)?;
        *store = Some((cfg.keys_db.clone(), opened));
        self.cache.invalidate_all();
        Ok(())
    }

    /// The caller of a request, from `Authorization: Bearer tg-…`, `x-api-key: tg-…` or HTTP
    /// Basic credentials holding the key. `Ok(None)` when auth is off.
    pub fn authenticate(&self, cfg: &AuthConfig, headers: &HeaderMap) -> Result<Option<Principal>, Error> {
        if !cfg.enabled {
            return Ok(None);
        }
        let presented = presented_keys(headers);
        let secret: &str = match presented.as_slice() {
            [] => {
                return Err(Error::Unauthorized(
                    "You didn't provide an API key. Send a tiergate key (created with `tiergate keys create`) as `Authorization: Bearer tg-…`.",
                ));
            }
            [one] => one,
            _ => {
                return Err(Error::Unauthorized(
                    "More than one API key was sent (in repeated `Authorization` or `x-api-key` headers); send exactly one.",
                ));
            }
        };
        let hash = store::hash_secret(secret);
        let key = match self.cache.get(&hash) {
            Some(k) => k,
            None => {
                // A point lookup on the hash's unique index: microseconds, and only once per
                // key per `cache_ttl`, so it runs inline rather than on a blocking thread.
                let found = match &*self.store.lock().unwrap_or_else(|p| p.into_inner()) {
                    Some((_, store)) => store.by_hash(&hash),
                    None => return Err(Error::Internal("the key store is not open".to_owned())),
                };
                let found = match found {
                    Ok(k) => k.map(Arc::new),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the key store");
                        return Err(Error::Internal("cannot read the key store".to_owned()));
                    }
                };
                self.cache.insert(hash, found.clone());
                found
            }
        };
        match key {
            None => Err(Error::Unauthorized(
                "Incorrect API key provided. Use a tiergate key created with `tiergate keys create`; provider keys are not accepted.",
            )),
            Some(k) if k.revoked_ms.is_some() => Err(Error::Unauthorized(
                "This API key has been revoked. Ask for a new one (`tiergate keys create`).",
            )),
            Some(k) => Ok(Some(Principal {
                limits: k.limits.or(&cfg.defaults),
                key: k,
            })),
        }
    }
}

/// Every distinct key the request presents, as a bearer token or in `x-api-key`. More than
/// one is refused rather than resolved: which copy of a repeated header wins differs
/// between the proxies in front and the gateway, so honouring one could let a request
/// pass on credentials that a proxy checked were not its own.
fn presented_keys(headers: &HeaderMap) -> Vec<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    let authorization = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            if scheme.eq_ignore_ascii_case("bearer") {
                Some(Cow::Borrowed(rest.trim()))
            } else if scheme.eq_ignore_ascii_case("basic") {
                basic_key(rest.trim()).map(Cow::Owned)
            } else {
                None
            }
        });
    let api_key = headers
        .get_all("x-api-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| Cow::Borrowed(v.trim()));
    let mut keys: Vec<Cow<'_, str>> = authorization.chain(api_key).filter(|k| !k.is_empty()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The key in HTTP Basic credentials, which is what a browser can send (it prompts for them
/// when `/report` answers 401): the password, or the user name when the password is empty.
fn basic_key(credentials: &str) -> Option<String> {
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD.decode(credentials).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    let key = if password.trim().is_empty() { user } else { password };
    Some(key.trim().to_owned())
}

#[cfg(test)]
mod tests;
