//! The usage ledger: one row per request in a SQLite file (WAL). Rows are queued on a
//! bounded channel and written in batches by one writer thread, never on an async worker.
//! A request that is answered waits for its row's commit before its last bytes go out
//! ([`Ledger::record_durable`]), so an answered request is never lost to a process kill;
//! concurrent rows share one transaction (group commit). Rows that nobody waits for (a
//! client that went away) are queued without waiting; a full queue drops such a row,
//! counts and logs it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};

/// One request's accounting. Never holds a secret: `api_key_id` is the key's id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// Unix time in milliseconds when the request arrived.
    pub ts_ms: i64,
    pub request_id: String,
    pub api_key_id: Option<String>,
    pub requested_model: Option<String>,
    pub tier: Option<String>,
    pub backend_model: Option<String>,
    pub score: Option<f64>,
    pub scorer: Option<String>,
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// True when token counts are the gateway's estimate rather than the upstream's usage.
    pub tokens_estimated: bool,
    pub ttft_ms: Option<f64>,
    pub latency_ms: f64,
    /// Time the gateway itself spent before calling the tier (parsing, scoring, policy).
    pub gateway_ms: f64,
    pub cost_usd: f64,
    pub baseline_cost_usd: f64,
    /// `ok`, or the error code (`upstream_timeout`, `invalid_json`, `client_disconnected`…).
    pub outcome: String,
    pub http_status: u16,
    pub streamed: bool,
    /// The first tier failed or was saturated, and another tier answered.
    pub fallback: bool,
    /// The first tier's answer was judged too weak and the request was re-asked.
    pub escalated: bool,
    /// Every tier call when there was more than one (escalation, fallback); `cost_usd`
    /// is their sum. Empty for the usual single call.
    pub attempts: Vec<Attempt>,
}

/// One call to a tier within a request that needed several.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attempt {
    pub tier: String,
    pub backend_model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub latency_ms: f64,
    /// The local tier's confidence in its answer, when it reports one.
    pub confidence: Option<f64>,
    /// `ok`, or why this attempt did not give the answer (`saturated`, `low_confidence`, an error code).
    pub outcome: String,
}

enum Msg {
    /// A row, and who to tell once it is committed.
    Row(Box<Record>, Option<oneshot::Sender<()>>),
    Flush(oneshot::Sender<()>),
    /// Stop after writing everything queued before it.
    Close,
}

/// Longest wait for room in a full queue before a row is dropped.
const DURABLE_QUEUE_WAIT: Duration = Duration::from_secs(5);
/// How often committed rows are checkpointed from the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Handle to the ledger writer; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    dropped: AtomicU64,
    written: AtomicU64,
    writer_alive: AtomicBool,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    api_key_id TEXT,
    requested_model TEXT,
    tier TEXT,
    backend_model TEXT,
    score REAL,
    scorer TEXT,
    policy TEXT,
    rule TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    tokens_estimated INTEGER NOT NULL,
    ttft_ms REAL,
    latency_ms REAL NOT NULL,
    gateway_ms REAL NOT NULL,
    cost_usd REAL NOT NULL,
    baseline_cost_usd REAL NOT NULL,
    outcome TEXT NOT NULL,
    http_status INTEGER NOT NULL,
    streamed INTEGER NOT NULL,
    fallback INTEGER NOT NULL DEFAULT 0,
    escalated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts_ms);
-- `tiergate report --request-id-prefix` (one replay run) and lookups of one request.
CREATE INDEX IF NOT EXISTS requests_request_id ON requests (request_id);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    tier TEXT NOT NULL,
    backend_model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    latency_ms REAL NOT NULL,
    confidence REAL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_request ON attempts (request_id);
PRAGMA user_version = 1;
";

pub const COLUMNS: &str = "ts_ms, request_id, api_key_id, requested_model, tier, backend_model, score, scorer, \
policy, rule, prompt_tokens, completion_tokens, tokens_estimated, ttft_ms, latency_ms, gateway_ms, cost_usd, \
baseline_cost_usd, outcome, http_status, streamed, fallback, escalated";

/// The columns of `requests` that this version writes and reads (`COLUMNS`) but `conn`'s
/// ledger lacks: a ledger written by another version of tiergate (the schema has no
/// migrations), which would fail at the first row or query.
pub fn missing_columns(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('requests')")?;
    let have = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<std::collections::HashSet<_>>>()?;
    if have.is_empty() {
        // No table yet: a new ledger.
        return Ok(Vec::new());
    }
    Ok(COLUMNS
        .split(',')
        .map(str::trim)
        .filter(|c| !have.contains(*c))
        .map(str::to_owned)
        .collect())
}

/// Says which of this version's columns a ledger lacks, as an error naming the file.
pub fn check_columns(conn: &Connection, path: &Path) -> Result<(), String> {
    let missing = missing_columns(conn).map_err(|e| format!("ledger `{}`: {e}", path.display()))?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "ledger `{}` was written by another version of tiergate: its `requests` table has no `{}` column; \
         give this version a new `ledger.path` (and read the old file with the version that wrote it)",
        path.display(),
        missing.join("`, `")
    ))
}

/// Opens (creating if needed) a ledger database with the schema and WAL mode.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode: a commit is in the WAL file (the OS page cache) when it returns,
    // so it survives a process crash (kill -9, OOM kill, panic); tests/it/durability.rs
    // checks it under load. Only an OS crash or power loss can lose the last commits before the next
    // checkpoint. FULL would fsync the WAL on every commit, i.e. on the path of every
    // answered request; for usage accounting that trade is not worth it.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

impl Ledger {
    /// Opens the database and starts the writer thread.
    pub fn start(path: &Path, capacity: usize, batch_size: usize) -> Result<Ledger, String> {
        // Before `open` applies the schema, whose indexes would fail on an old table with
        // SQLite's bare "no such column".
        if let Ok(existing) = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) {
            check_columns(&existing, path)?;
        }
        let conn = open(path).map_err(|e| format!("cannot open ledger `{}`: {e}", path.display()))?;
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            writer_alive: AtomicBool::new(true),
            thread: std::sync::Mutex::new(None),
        });
        // Every answer waits for its row's commit, so the commit path must not include the
        // WAL checkpoint (it fsyncs the WAL and the database: milliseconds, every few hundred
        // commits, showing as the p99 of every request). A thread of its own runs it instead;
        // a PASSIVE checkpoint never blocks the writer.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| format!("cannot configure ledger `{}`: {e}", path.display()))?;
        let checkpoints =
            open(path).map_err(|e| format!("cannot open ledger `{}` for checkpoints: {e}", path.display()))?;
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("tiergate-ledger".into())
            .spawn(move || writer(conn, rx, batch_size, &s))
            .map_err(|e| format!("cannot start the ledger writer: {e}"))?;
        *shared.thread.lock().expect("ledger mutex") = Some(handle);
        let s = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("tiergate-ledger-checkpoint".into())
            .spawn(move || checkpointer(checkpoints, s))
            .map_err(|e| format!("cannot start the ledger checkpointer: {e}"))?;
        Ok(Ledger { tx, shared })
    }

    /// Queues a row without waiting. Never fails the request: a full queue drops the row,
    /// and the drop is counted (`dropped()`, `/readyz`) and logged.
    pub fn record(&self, rec: Record) {
        if let Err(e) = self.tx.try_send(Msg::Row(Box::new(rec), None)) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "writer stopped",
            };
            self.count_drop(why);
        }
    }

    /// Queues a row and waits until it is committed. On a full queue it waits for room
    /// (bounded) rather than dropping the row: the caller's answer is held back meanwhile,
    /// which slows clients down instead of losing their accounting.
    pub async fn record_durable(&self, rec: Record) {
        let (ack, committed) = oneshot::channel();
        let msg = Msg::Row(Box::new(rec), Some(ack));
        let queued = match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(msg)) => {
                match tokio::time::timeout(DURABLE_QUEUE_WAIT, self.tx.send(msg)).await {
                    Ok(Ok(())) => true,
                    Ok(Err(_)) => {
                        self.count_drop("writer stopped");
                        false
                    }
                    Err(_) => {
                        self.count_drop("queue full");
                        false
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.count_drop("writer stopped");
                false
            }
        };
        if queued {
            // An error here means the batch failed to commit; the writer counted and logged it.
            let _ = committed.await;
        }
    }

    fn count_drop(&self, why: &'static str) {
        let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(dropped_total = n, reason = why, "ledger row dropped");
    }

    /// Waits until every row queued before this call is committed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Writes everything queued and stops the writer; rows recorded afterwards are dropped
    /// and counted.
    pub async fn shutdown(self) {
        self.flush().await;
        let _ = self.tx.send(Msg::Close).await;
        let handle = self.shared.thread.lock().expect("ledger mutex").take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn is_alive(&self) -> bool {
        self.shared.writer_alive.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

fn writer(mut conn: Connection, mut rx: mpsc::Receiver<Msg>, batch_size: usize, shared: &Shared) {
    let mut batch: Vec<Box<Record>> = Vec::with_capacity(batch_size);
    // Flushes, and requests waiting for their row: told once the batch is committed.
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut closing = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Row(r, ack) => {
                    batch.push(r);
                    waiters.extend(ack);
                }
                Msg::Flush(w) => waiters.push(w),
                Msg::Close => closing = true,
            }
            if batch.len() < batch_size {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            match insert(&mut conn, &batch) {
                Ok(()) => {
                    shared.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    let n = shared.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
                    tracing::error!(error = %e, rows = batch.len(), dropped_total = n, "ledger batch write failed");
                }
            }
            batch.clear();
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
        if closing {
            rx.close();
            break;
        }
    }
    shared.writer_alive.store(false, Ordering::Relaxed);
}

/// Copies committed WAL frames into the database once a second, off the commit path, until
/// the writer has stopped (then once more).
fn checkpointer(conn: Connection, shared: std::sync::Weak<Shared>) {
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        let alive = shared.upgrade().is_some_and(|s| s.writer_alive.load(Ordering::Relaxed));
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "ledger checkpoint failed; the WAL file grows until one succeeds");
        }
        if !alive {
            return;
        }
    }
}

fn insert(conn: &mut Connection, rows: &[Box<Record>]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(&format!(
            "INSERT INTO requests ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)"
        ))?;
        let mut attempt = tx.prepare_cached(
            "INSERT INTO attempts (request_id, n, tier, backend_model, prompt_tokens, completion_tokens, cost_usd, latency_ms, confidence, outcome) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for r in rows {
            stmt.execute(params![
                r.ts_ms,
                r.request_id,
                r.api_key_id,
                r.requested_model,
                r.tier,
                r.backend_model,
                r.score,
                r.scorer,
                r.policy,
                r.rule,
                r.prompt_tokens as i64,
                r.completion_tokens as i64,
                r.tokens_estimated,
                r.ttft_ms,
                r.latency_ms,
                r.gateway_ms,
                r.cost_usd,
                r.baseline_cost_usd,
                r.outcome,
                r.http_status,
                r.streamed,
                r.fallback,
                r.escalated,
            ])?;
            for (n, a) in r.attempts.iter().enumerate() {
                attempt.execute(params![
                    r.request_id,
                    n as i64,
                    a.tier,
                    a.backend_model,
                    a.prompt_tokens as i64,
                    a.completion_tokens as i64,
                    a.cost_usd,
                    a.latency_ms,
                    a.confidence,
                    a.outcome,
                ])?;
            }
        }
    }
    tx.commit()
}

/// Reads every row back, oldest first (for tests and reports).
pub fn read_all(path: &Path) -> rusqlite::Result<Vec<Record>> {
    let conn = Connection::open(path)?;
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM requests ORDER BY id"))?;
    let rows = stmt.query_map([], |row| {
        Ok(Record {
            ts_ms: row.get(0)?,
            request_id: row.get(1)?,
            api_key_id: row.get(2)?,
            requested_model: row.get(3)?,
            tier: row.get(4)?,
            backend_model: row.get(5)?,
            score: row.get(6)?,
            scorer: row.get(7)?,
            policy: row.get(8)?,
            rule: row.get(9)?,
            prompt_tokens: row.get::<_, i64>(10)? as u64,
            completion_tokens: row.get::<_, i64>(11)? as u64,
            tokens_estimated: row.get(12)?,
            ttft_ms: row.get(13)?,
            latency_ms: row.get(14)?,
            gateway_ms: row.get(15)?,
            cost_usd: row.get(16)?,
            baseline_cost_usd: row.get(17)?,
            outcome: row.get(18)?,
            http_status: row.get(19)?,
            streamed: row.get(20)?,
            fallback: row.get(21)?,
            escalated: row.get(22)?,
            attempts: Vec::new(),
        })
    })?;
    let mut out: Vec<Record> = rows.collect::<rusqlite::Result<_>>()?;
    let mut stmt = conn.prepare(
        "SELECT request_id, tier, backend_model, prompt_tokens, completion_tokens, cost_usd, latency_ms, confidence, outcome \
         FROM attempts ORDER BY request_id, n",
    )?;
    let mut attempts: std::collections::HashMap<String, Vec<Attempt>> = std::collections::HashMap::new();
    for a in stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            Attempt {
                tier: row.get(1)?,
                backend_model: row.get(2)?,
                prompt_tokens: row.get::<_, i64>(3)? as u64,
                completion_tokens: row.get::<_, i64>(4)? as u64,
                cost_usd: row.get(5)?,
                latency_ms: row.get(6)?,
                confidence: row.get(7)?,
                outcome: row.get(8)?,
            },
        ))
    })? {
        let (id, a) = a?;
        attempts.entry(id).or_default().push(a);
    }
    for r in &mut out {
        if let Some(a) = attempts.remove(&r.request_id) {
            r.attempts = a;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
