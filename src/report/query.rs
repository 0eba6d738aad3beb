//! The report's SQL: aggregates computed by SQLite in each ledger file and summed across
//! files, and exact percentiles from each file's rows streamed in sorted order and merged,
//! so memory stays at one row per file whatever the ledgers' size.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, params_from_iter};

use super::{
    Filter, LATENCY_BOUNDS_MS, LatencyHistogram, Percentiles, Point, Report, ReportError, RuleStats, Series, Stats,
    Totals,
};

/// SQL for a row's tier label; rows that never reached a tier get [`super::UNROUTED`].
const TIER: &str = "COALESCE(tier, '(unrouted)')";
/// An error is any outcome but success and the client walking away.
const IS_ERROR: &str = "(outcome <> 'ok' AND outcome <> 'client_disconnected')";
const OK: &str = "outcome = 'ok'";
const TOTAL: &str = "total";
const TOP_RULES: usize = 10;

/// Bucket widths the series may use; the smallest giving at most `MAX_POINTS` buckets wins.
const BUCKETS_MS: &[i64] = &[
    1_000,
    2_000,
    5_000,
    10_000,
    60_000,
    5 * 60_000,
    15 * 60_000,
    3_600_000,
    3 * 3_600_000,
    6 * 3_600_000,
    86_400_000,
    7 * 86_400_000,
];
const MAX_POINTS: i64 = 60;

struct Ledgers {
    conns: Vec<(PathBuf, Connection)>,
    /// `WHERE …` for the filter, and its parameters.
    where_sql: String,
    params: Vec<Value>,
}

impl Ledgers {
    fn open(paths: &[PathBuf], filter: &Filter) -> Result<Ledgers, ReportError> {
        if paths.is_empty() {
            return Err(ReportError("no ledger to read; pass `--ledger FILE`".into()));
        }
        let mut conns = Vec::with_capacity(paths.len());
        let mut seen: Vec<(PathBuf, &PathBuf)> = Vec::new();
        for p in paths {
            // The same file under two names would count every row twice.
            if let Ok(real) = std::fs::canonicalize(p) {
                if let Some((_, first)) = seen.iter().find(|(r, _)| *r == real) {
                    return Err(ReportError::ledger(
                        p,
                        format!("is the same file as `{}`; pass each ledger once", first.display()),
                    ));
                }
                seen.push((real, p));
            }
            conns.push((p.clone(), open_read_only(p)?));
        }
        let (where_sql, params) = where_clause(filter);
        Ok(Ledgers {
            conns,
            where_sql,
            params,
        })
    }

    /// Runs `select` (which must contain `{where}`, optionally followed by more conditions
    /// with `AND`) in every ledger, handing each row to `each`.
    fn for_each_row(
        &self,
        select: &str,
        mut each: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<()>,
    ) -> Result<(), ReportError> {
        let sql = select.replace("{where}", &self.where_sql);
        for (path, conn) in &self.conns {
            let mut run = || -> rusqlite::Result<()> {
                let mut stmt = conn.prepare(&sql)?;
                let mut rows = stmt.query(params_from_iter(self.params.iter()))?;
                while let Some(row) = rows.next()? {
                    each(row)?;
                }
                Ok(())
            };
            run().map_err(|e| ReportError::ledger(path, e))?;
        }
        Ok(())
    }

    /// Exact nearest-rank p50/p95/p99 of `value` per group, over rows matching the filter
    /// and `cond`. Each ledger streams its rows sorted by (group, value) and a heap merges
    /// them; SQLite's sorter spills to disk, so nothing here grows with the ledger.
    fn percentiles(&self, group: &str, value: &str, cond: &str) -> Result<BTreeMap<String, Percentiles>, ReportError> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        self.for_each_row(
            &format!("SELECT {group}, COUNT(*) FROM requests {{where}} AND {cond} AND {value} IS NOT NULL GROUP BY 1"),
            |r| {
                *counts.entry(r.get(0)?).or_default() += r.get::<_, i64>(1)? as u64;
                Ok(())
            },
        )?;
        let mut out: BTreeMap<String, Percentiles> = counts
            .iter()
            .map(|(g, &n)| {
                (
                    g.clone(),
                    Percentiles {
                        count: n,
                        ..Percentiles::default()
                    },
                )
            })
            .collect();
        if counts.is_empty() {
            return Ok(out);
        }

        let sql = format!(
            "SELECT {group}, {value} FROM requests {where_sql} AND {cond} AND {value} IS NOT NULL ORDER BY 1, 2",
            where_sql = self.where_sql
        );
        let mut stmts = Vec::with_capacity(self.conns.len());
        for (path, conn) in &self.conns {
            stmts.push(conn.prepare(&sql).map_err(|e| ReportError::ledger(path, e))?);
        }
        let mut cursors = Vec::with_capacity(stmts.len());
        for (stmt, (path, _)) in stmts.iter_mut().zip(&self.conns) {
            cursors.push((
                path.as_path(),
                stmt.query(params_from_iter(self.params.iter()))
                    .map_err(|e| ReportError::ledger(path, e))?,
            ));
        }
        let mut heap = BinaryHeap::new();
        for (i, (path, rows)) in cursors.iter_mut().enumerate() {
            if let Some(h) = next_head(path, rows, i)? {
                heap.push(h);
            }
        }
        let mut current: Option<String> = None;
        let mut rank = 0u64;
        while let Some(Head { group, value, src }) = heap.pop() {
            if current.as_deref() != Some(group.as_str()) {
                current = Some(group.clone());
                rank = 0;
            }
            rank += 1;
            if let Some(p) = out.get_mut(&group) {
                for (q, slot) in [(0.50, &mut p.p50), (0.95, &mut p.p95), (0.99, &mut p.p99)] {
                    if rank == nearest_rank(q, p.count) {
                        *slot = Some(value);
                    }
                }
            }
            let (path, rows) = &mut cursors[src];
            if let Some(h) = next_head(path, rows, src)? {
                heap.push(h);
            }
        }
        Ok(out)
    }
}

fn open_read_only(path: &Path) -> Result<Connection, ReportError> {
    if path.is_dir() {
        return Err(ReportError::ledger(
            path,
            "is a directory; pass the ledger file in it (the gateway's `ledger.path`) with `--ledger`",
        ));
    }
    if !path.is_file() {
        return Err(ReportError::ledger(
            path,
            "no such file; pass the gateway's `ledger.path` with `--ledger`",
        ));
    }
    let has_table = match open_checked(path, false) {
        // Reading a WAL database makes SQLite create its `-shm` file beside it, which fails in
        // a directory the reader cannot write (a mounted replica, another user's ledger).
        // Without a `-wal` file the database file holds every row: read it as immutable.
        Err(rusqlite::Error::SqliteFailure(e, _))
            if matches!(e.code, rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen)
                && !wal_file(path).exists() =>
        {
            open_checked(path, true)
        }
        Err(e @ rusqlite::Error::SqliteFailure(f, _))
            if matches!(f.code, rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen) =>
        {
            return Err(ReportError::ledger(
                path,
                format!(
                    "{e}: a ledger with a `-wal` file beside it is read with a `-shm` file that SQLite \
                     creates in the same directory, so that directory must be writable (or copy \
                     the ledger with its `-wal` file to one that is)"
                ),
            ));
        }
        other => other,
    };
    let (conn, has_table) = has_table.map_err(|e| ReportError::ledger(path, e))?;
    if !has_table {
        return Err(ReportError::ledger(path, "not a tiergate ledger (no `requests` table)"));
    }
    crate::ledger::check_columns(&conn, path).map_err(ReportError)?;
    Ok(conn)
}

fn wal_file(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Opens `path` read-only (as SQLite's `immutable`: no locks, no `-shm`, nothing written) and
/// says whether it has the ledger's table.
pub(super) fn open_checked(path: &Path, immutable: bool) -> rusqlite::Result<(Connection, bool)> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = if immutable {
        let text = path.to_str().ok_or(rusqlite::Error::InvalidPath(path.to_owned()))?;
        let escaped = text.replace('%', "%25").replace('?', "%3f").replace('#', "%23");
        Connection::open_with_flags(
            format!("file:{escaped}?immutable=1"),
            flags | OpenFlags::SQLITE_OPEN_URI,
        )?
    } else {
        Connection::open_with_flags(path, flags)?
    };
    // A running gateway may be writing; wait for its batch rather than fail.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let has_table = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests')",
        [],
        |r| r.get(0),
    )?;
    Ok((conn, has_table))
}

/// `WHERE` clause for a filter; always non-empty so callers can append `AND …`.
fn where_clause(f: &Filter) -> (String, Vec<Value>) {
    let mut conds = vec!["1 = 1".to_owned()];
    let mut params = Vec::new();
    let mut add = |cond: &str, v: Value| {
        params.push(v);
        conds.push(cond.replace('?', &format!("?{}", params.len())));
    };
    if let Some(t) = f.since_ms {
        add("ts_ms >= ?", Value::Integer(t));
    }
    if let Some(t) = f.until_ms {
        add("ts_ms < ?", Value::Integer(t));
    }
    if let Some(k) = &f.key {
        add("api_key_id = ?", Value::Text(k.clone()));
    }
    if let Some(p) = &f.policy {
        add("policy = ?", Value::Text(p.clone()));
    }
    if let Some(prefix) = &f.request_id_prefix {
        // A range rather than LIKE, so the `request_id` index serves it and `%`/`_` in
        // the prefix mean themselves.
        add("request_id >= ?", Value::Text(prefix.clone()));
        add("request_id < ?", Value::Text(format!("{prefix}\u{10FFFF}")));
    }
    (format!("WHERE {}", conds.join(" AND ")), params)
}

/// 1-based rank of the nearest-rank `q` quantile of `n` sorted values.
fn nearest_rank(q: f64, n: u64) -> u64 {
    ((q * n as f64).ceil() as u64).clamp(1, n.max(1))
}

struct Head {
    group: String,
    value: f64,
    src: usize,
}

impl Ord for Head {
    // Reversed: `BinaryHeap` is a max-heap and the merge wants the smallest first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .group
            .cmp(&self.group)
            .then_with(|| other.value.total_cmp(&self.value))
            .then_with(|| other.src.cmp(&self.src))
    }
}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head {}

fn next_head(path: &Path, rows: &mut rusqlite::Rows<'_>, src: usize) -> Result<Option<Head>, ReportError> {
    let row = rows.next().map_err(|e| ReportError::ledger(path, e))?;
    row.map(|r| {
        Ok(Head {
            group: r.get(0)?,
            value: r.get(1)?,
            src,
        })
    })
    .transpose()
    .map_err(|e: rusqlite::Error| ReportError::ledger(path, e))
}

/// Builds the report for `filter` over `ledgers` (one file per gateway replica).
pub fn build(ledgers: &[PathBuf], filter: &Filter) -> Result<Report, ReportError> {
    let db = Ledgers::open(ledgers, filter)?;

    let mut tiers: BTreeMap<String, Stats> = BTreeMap::new();
    let mut first: Option<i64> = None;
    let mut last: Option<i64> = None;
    db.for_each_row(
        &format!(
            "SELECT {TIER}, COUNT(*), TOTAL(prompt_tokens), TOTAL(completion_tokens), \
             SUM(tokens_estimated), TOTAL(cost_usd), TOTAL(baseline_cost_usd), SUM({IS_ERROR}), \
             SUM(outcome = 'client_disconnected'), SUM(fallback), SUM(escalated), MIN(ts_ms), MAX(ts_ms) \
             FROM requests {{where}} GROUP BY 1"
        ),
        |r| {
            let s = tiers.entry(r.get(0)?).or_default();
            s.requests += r.get::<_, i64>(1)? as u64;
            s.prompt_tokens += r.get::<_, f64>(2)? as u64;
            s.completion_tokens += r.get::<_, f64>(3)? as u64;
            s.tokens_estimated += r.get::<_, i64>(4)? as u64;
            s.cost_usd += r.get::<_, f64>(5)?;
            s.baseline_cost_usd += r.get::<_, f64>(6)?;
            s.errors += r.get::<_, i64>(7)? as u64;
            s.disconnected += r.get::<_, i64>(8)? as u64;
            s.fallbacks += r.get::<_, i64>(9)? as u64;
            s.escalations += r.get::<_, i64>(10)? as u64;
            let (lo, hi): (i64, i64) = (r.get(11)?, r.get(12)?);
            first = Some(first.map_or(lo, |f| f.min(lo)));
            last = Some(last.map_or(hi, |l| l.max(hi)));
            Ok(())
        },
    )?;

    let mut total = Stats {
        tier: TOTAL.to_owned(),
        ..Stats::default()
    };
    for (name, s) in &mut tiers {
        s.tier = name.clone();
        total.requests += s.requests;
        total.prompt_tokens += s.prompt_tokens;
        total.completion_tokens += s.completion_tokens;
        total.tokens_estimated += s.tokens_estimated;
        total.cost_usd += s.cost_usd;
        total.baseline_cost_usd += s.baseline_cost_usd;
        total.errors += s.errors;
        total.disconnected += s.disconnected;
        total.fallbacks += s.fallbacks;
        total.escalations += s.escalations;
    }
    let all = total.requests;
    let ratio = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };

    let mut ttft = db.percentiles(TIER, "ttft_ms", OK)?;
    let mut latency = db.percentiles(TIER, "latency_ms", OK)?;
    for (name, s) in &mut tiers {
        s.share = ratio(s.requests, all);
        s.error_rate = ratio(s.errors, s.requests);
        s.ttft_ms = ttft.remove(name).unwrap_or_default();
        s.latency_ms = latency.remove(name).unwrap_or_default();
    }
    let whole = format!("'{TOTAL}'");
    total.share = if all == 0 { 0.0 } else { 1.0 };
    total.error_rate = ratio(total.errors, all);
    total.ttft_ms = db.percentiles(&whole, "ttft_ms", OK)?.remove(TOTAL).unwrap_or_default();
    total.latency_ms = db
        .percentiles(&whole, "latency_ms", OK)?
        .remove(TOTAL)
        .unwrap_or_default();
    // Only requests that reached a tier: for rejected ones `gateway_ms` is the whole
    // (short) request, which would flatter the overhead.
    let gateway_ms = db
        .percentiles(&whole, "gateway_ms", "tier IS NOT NULL")?
        .remove(TOTAL)
        .unwrap_or_default();

    let savings_usd = total.baseline_cost_usd - total.cost_usd;
    let savings_pct = (total.baseline_cost_usd > 0.0).then(|| savings_usd / total.baseline_cost_usd);

    let mut tiers: Vec<Stats> = tiers.into_values().collect();
    // Busiest first; requests that never reached a tier last, whatever their number.
    tiers.sort_by_key(|s| (s.tier == super::UNROUTED, std::cmp::Reverse(s.requests), s.tier.clone()));

    let window = match (filter.since_ms.or(first), filter.until_ms.or(last.map(|l| l + 1))) {
        (Some(a), Some(b)) if b > a => Some((a, b)),
        _ => None,
    };
    let series = match window {
        Some((start, end)) => series(&db, start, end)?,
        None => Series::default(),
    };

    Ok(Report {
        filter: filter.clone(),
        ledgers: ledgers.len(),
        first_ts_ms: first,
        last_ts_ms: last,
        totals: Totals {
            stats: total,
            savings_usd,
            savings_pct,
            gateway_ms,
        },
        tiers,
        series,
        latency_histogram: latency_histogram(&db)?,
        top_rules: top_rules(&db, all)?,
    })
}

fn series(db: &Ledgers, start: i64, end: i64) -> Result<Series, ReportError> {
    let span = end - start;
    let bucket_ms = BUCKETS_MS
        .iter()
        .copied()
        .find(|b| (span + b - 1) / b <= MAX_POINTS)
        .unwrap_or_else(|| (span + MAX_POINTS - 1) / MAX_POINTS);
    // Buckets are aligned to whole multiples of their width (so an hour bucket starts on
    // the hour), which can add one bucket at each end.
    let first = start.div_euclid(bucket_ms);
    let last = (end - 1).div_euclid(bucket_ms);
    let mut points: Vec<Point> = (first..=last)
        .map(|b| Point {
            ts_ms: b * bucket_ms,
            ..Point::default()
        })
        .collect();
    db.for_each_row(
        &format!(
            "SELECT ts_ms / {bucket_ms} - (ts_ms < 0 AND ts_ms % {bucket_ms} <> 0), {TIER}, COUNT(*), \
             TOTAL(cost_usd), TOTAL(baseline_cost_usd) FROM requests {{where}} \
             AND ts_ms >= {start} AND ts_ms < {end} GROUP BY 1, 2"
        ),
        |r| {
            let b: i64 = r.get(0)?;
            if let Some(p) = usize::try_from(b - first).ok().and_then(|i| points.get_mut(i)) {
                let n = r.get::<_, i64>(2)? as u64;
                p.requests += n;
                *p.requests_by_tier.entry(r.get(1)?).or_default() += n;
                p.cost_usd += r.get::<_, f64>(3)?;
                p.baseline_cost_usd += r.get::<_, f64>(4)?;
            }
            Ok(())
        },
    )?;
    Ok(Series { bucket_ms, points })
}

fn latency_histogram(db: &Ledgers) -> Result<LatencyHistogram, ReportError> {
    let mut case = String::from("CASE");
    for (i, b) in LATENCY_BOUNDS_MS.iter().enumerate() {
        case.push_str(&format!(" WHEN latency_ms < {b:?} THEN {i}"));
    }
    case.push_str(&format!(" ELSE {} END", LATENCY_BOUNDS_MS.len()));
    let mut tiers: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    db.for_each_row(
        &format!("SELECT {TIER}, {case}, COUNT(*) FROM requests {{where}} AND {OK} GROUP BY 1, 2"),
        |r| {
            let counts = tiers
                .entry(r.get(0)?)
                .or_insert_with(|| vec![0; LATENCY_BOUNDS_MS.len() + 1]);
            let b: i64 = r.get(1)?;
            if let Some(c) = usize::try_from(b).ok().and_then(|b| counts.get_mut(b)) {
                *c += r.get::<_, i64>(2)? as u64;
            }
            Ok(())
        },
    )?;
    Ok(LatencyHistogram {
        bounds_ms: LATENCY_BOUNDS_MS.to_vec(),
        tiers,
    })
}

fn top_rules(db: &Ledgers, all: u64) -> Result<Vec<RuleStats>, ReportError> {
    let mut rules: BTreeMap<(Option<String>, String, String), RuleStats> = BTreeMap::new();
    db.for_each_row(
        &format!(
            "SELECT policy, rule, {TIER}, COUNT(*), TOTAL(cost_usd), TOTAL(baseline_cost_usd) \
             FROM requests {{where}} AND rule IS NOT NULL GROUP BY 1, 2, 3"
        ),
        |r| {
            let key: (Option<String>, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let s = rules.entry(key.clone()).or_insert_with(|| RuleStats {
                policy: key.0,
                rule: key.1,
                tier: key.2,
                ..RuleStats::default()
            });
            s.requests += r.get::<_, i64>(3)? as u64;
            s.cost_usd += r.get::<_, f64>(4)?;
            s.baseline_cost_usd += r.get::<_, f64>(5)?;
            Ok(())
        },
    )?;
    let mut out: Vec<RuleStats> = rules.into_values().collect();
    for r in &mut out {
        r.share = if all == 0 { 0.0 } else { r.requests as f64 / all as f64 };
    }
    out.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then_with(|| a.rule.cmp(&b.rule))
            .then_with(|| a.tier.cmp(&b.tier))
    });
    out.truncate(TOP_RULES);
    Ok(out)
}

#[cfg(test)]
mod unit {
    use super::nearest_rank;

    #[test]
    fn nearest_rank_matches_the_textbook_definition() {
        assert_eq!(nearest_rank(0.5, 1), 1);
        assert_eq!(nearest_rank(0.5, 10), 5);
        assert_eq!(nearest_rank(0.95, 10), 10);
        assert_eq!(nearest_rank(0.99, 100), 99);
        assert_eq!(nearest_rank(0.95, 20), 19);
    }
}
