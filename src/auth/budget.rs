//! Per-key spend against daily and monthly USD budgets (UTC days and months). A request
//! bound for a paid tier reserves its largest possible cost before the call and settles to
//! the actual cost after it, so racing requests cannot together overspend: each holds its
//! worst case until its actual cost is known.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::KeyLimits;

/// A key's spend in the current UTC day and month, and what in-flight requests reserved.
#[derive(Debug, Default, Clone, Copy)]
struct Spend {
    day: i64,
    month: i64,
    day_usd: f64,
    month_usd: f64,
    reserved_usd: f64,
}

/// Which budget a request would break.
#[derive(Debug, Clone, PartialEq)]
pub struct OverBudget {
    pub period: &'static str,
    pub limit_usd: f64,
    pub spent_usd: f64,
    pub reserved_usd: f64,
    pub needed_usd: f64,
    /// Seconds until the period rolls over (UTC).
    pub resets_in_secs: u64,
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this key's {} budget of ${:.4} would be exceeded: ${:.4} spent, ${:.4} reserved by requests in flight, and this request may cost up to ${:.4}; it resets in {} s (UTC)",
            self.period, self.limit_usd, self.spent_usd, self.reserved_usd, self.needed_usd, self.resets_in_secs
        )
    }
}

#[derive(Default)]
pub struct Budgets {
    keys: Mutex<HashMap<String, Spend>>,
}

const DAY_MS: i64 = 86_400_000;

/// Day number since the epoch and month number (`year * 12 + month0`) of `ms`, in UTC.
fn periods(ms: i64) -> (i64, i64) {
    let day = ms.div_euclid(DAY_MS);
    let date = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(day);
    (day, i64::from(date.year()) * 12 + i64::from(u8::from(date.month())) - 1)
}

/// Start of the UTC day and month that contain `ms`, in ms.
fn period_starts(ms: i64) -> (i64, i64) {
    let day = ms.div_euclid(DAY_MS);
    let date = (time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(day)).date();
    let first = date.replace_day(1).unwrap_or(date);
    let month_start = first.midnight().assume_utc().unix_timestamp() * 1000;
    (day * DAY_MS, month_start)
}

fn next_month_start(ms: i64) -> i64 {
    let (_, month_start) = period_starts(ms);
    // 32 days after a month's first day is always in the next month.
    period_starts(month_start + 32 * DAY_MS).1
}

impl Spend {
    fn roll(&mut self, now_ms: i64) {
        let (day, month) = periods(now_ms);
        if day != self.day {
            self.day = day;
            self.day_usd = 0.0;
        }
        if month != self.month {
            self.month = month;
            self.month_usd = 0.0;
        }
    }
}

/// A reservation to settle when the request ends; dropping it unsettled releases it.
pub struct Hold {
    budgets: Arc<Budgets>,
    key_id: String,
    reserved_usd: f64,
    settled: bool,
}

impl Hold {
    /// Replaces the reservation by what the request actually cost.
    pub fn settle(self, actual_usd: f64) {
        self.settle_at(actual_usd, crate::report::now_ms());
    }

    /// [`Hold::settle`] at a given time: the cost counts in that time's UTC day and month.
    pub fn settle_at(mut self, actual_usd: f64, now_ms: i64) {
        self.settled = true;
        self.budgets.settle(&self.key_id, self.reserved_usd, actual_usd, now_ms);
    }

    pub fn reserved_usd(&self) -> f64 {
        self.reserved_usd
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.settled {
            self.budgets
                .settle(&self.key_id, self.reserved_usd, 0.0, crate::report::now_ms());
        }
    }
}

impl Budgets {
    /// Rebuilds this UTC day's and month's spend per key from the ledger, so budgets hold
    /// across restarts. A missing ledger means nothing was spent.
    pub fn from_ledger(path: &Path, now_ms: i64) -> Result<Budgets, String> {
        let budgets = Budgets::default();
        if !path.exists() {
            return Ok(budgets);
        }
        let fail = |e: rusqlite::Error| format!("ledger `{}`: reading spend per key: {e}", path.display());
        let conn =
            rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(fail)?;
        let (day_start, month_start) = period_starts(now_ms);
        let mut stmt = conn
            .prepare(
                "SELECT api_key_id, COALESCE(SUM(CASE WHEN ts_ms >= ?1 THEN cost_usd END), 0), COALESCE(SUM(cost_usd), 0)
                 FROM requests WHERE ts_ms >= ?2 AND api_key_id IS NOT NULL GROUP BY api_key_id",
            )
            .map_err(fail)?;
        let rows = stmt
            .query_map([day_start, month_start], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?, r.get::<_, f64>(2)?))
            })
            .map_err(fail)?;
        let (day, month) = periods(now_ms);
        {
            let mut keys = budgets.keys.lock().unwrap_or_else(|p| p.into_inner());
            for row in rows {
                let (key, day_usd, month_usd) = row.map_err(fail)?;
                keys.insert(
                    key,
                    Spend {
                        day,
                        month,
                        day_usd,
                        month_usd,
                        reserved_usd: 0.0,
                    },
                );
            }
        }
        Ok(budgets)
    }

    /// Reserves `max_usd` for a request of `key_id` if it fits both of the key's budgets,
    /// counting what in-flight requests have reserved.
    pub fn reserve(
        self: &Arc<Self>,
        key_id: &str,
        limits: &KeyLimits,
        max_usd: f64,
        now_ms: i64,
    ) -> Result<Hold, OverBudget> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let s = keys.entry(key_id.to_owned()).or_default();
        s.roll(now_ms);
        for (period, limit, spent, resets_at) in [
            ("daily", limits.daily_usd, s.day_usd, (s.day + 1) * DAY_MS),
            ("monthly", limits.monthly_usd, s.month_usd, next_month_start(now_ms)),
        ] {
            if let Some(limit) = limit
                && spent + s.reserved_usd + max_usd > limit
            {
                return Err(OverBudget {
                    period,
                    limit_usd: limit,
                    spent_usd: spent,
                    reserved_usd: s.reserved_usd,
                    needed_usd: max_usd,
                    resets_in_secs: ((resets_at - now_ms).max(0) as u64).div_ceil(1000),
                });
            }
        }
        s.reserved_usd += max_usd;
        Ok(Hold {
            budgets: self.clone(),
            key_id: key_id.to_owned(),
            reserved_usd: max_usd,
            settled: false,
        })
    }

    /// Adds a cost that was not reserved (a request to a free tier, or downgraded).
    pub fn spend(&self, key_id: &str, usd: f64, now_ms: i64) {
        self.settle(key_id, 0.0, usd, now_ms);
    }

    fn settle(&self, key_id: &str, reserved_usd: f64, actual_usd: f64, now_ms: i64) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let s = keys.entry(key_id.to_owned()).or_default();
        s.roll(now_ms);
        s.reserved_usd = (s.reserved_usd - reserved_usd).max(0.0);
        let actual = if actual_usd.is_finite() {
            actual_usd.max(0.0)
        } else {
            0.0
        };
        s.day_usd += actual;
        s.month_usd += actual;
    }

    /// The key's spend today and this month (UTC), for tests and listings.
    pub fn spent(&self, key_id: &str, now_ms: i64) -> (f64, f64) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.get_mut(key_id)
            .map(|s| {
                s.roll(now_ms);
                (s.day_usd, s.month_usd)
            })
            .unwrap_or((0.0, 0.0))
    }
}

#[cfg(test)]
pub(super) fn test_period_starts(ms: i64) -> (i64, i64) {
    period_starts(ms)
}
